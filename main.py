"""Train, validate or test an FLM model: `python main.py fit -c conf/tiny.yaml`."""

from flm_lightning.cli import main

if __name__ == "__main__":
    main()
