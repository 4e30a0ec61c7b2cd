import sys

from cosmofm.cli import main

sys.exit(main())
