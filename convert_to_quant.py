"""Entry module: ``python convert_to_quant.py ...`` runs the quantkit CLI (no logic here)."""

from quantkit.cli import main

if __name__ == "__main__":
    main()
