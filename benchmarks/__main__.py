import sys

from .cases import CASES
from .harness import main

sys.exit(main(CASES))
