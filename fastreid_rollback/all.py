"The one import a user needs: `from fastreid_rollback.all import *`"
from .checks import *
from .metrics import *
from .retrieval import *
from .layout import *
from .synthetic import *
from .data import *
from .backbones import *
from .model import *
from .learner import *
from .distributed import *
from .rollback import *
from .experiment import *
from .inference import *
from .cli import *
