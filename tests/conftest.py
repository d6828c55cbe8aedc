"Fixtures shared by the test modules (helpers shared with the notebooks are in `fastreid_rollback.test_utils`)"
import pytest, torch

@pytest.fixture(scope='module')
def one_thread():
    "The problems of a module are tiny: on a busy machine, threads only add waiting"
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
