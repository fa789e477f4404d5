"""`python -m raygen.data.sources digits|shapes OUT ...`: see `export_embedded`."""
from raygen.data.sources import export_embedded

if __name__ == "__main__":
    export_embedded()
