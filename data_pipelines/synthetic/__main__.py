"""`python -m data_pipelines.synthetic --out DIR ...` (see writer.py)."""
import sys

from data_pipelines.synthetic.writer import main

sys.exit(main())
