import sys

from dmlray.cli import main

sys.exit(main())
