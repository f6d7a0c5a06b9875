import os
import sys

# Test helpers (tests/filter_inputs.py) are imported as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
