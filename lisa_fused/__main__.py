"""`python -m lisa_fused` is the `lisa-fused` command."""
import sys

from .cli import main

sys.exit(main())
