import sys

from uec_rag.cli import main

sys.exit(main())
