import sys

from interpkv.cli import main

sys.exit(main())
