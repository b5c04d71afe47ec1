"""``python -m viditq``: the ``viditq`` command line."""
from .cli import app

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="viditq")
