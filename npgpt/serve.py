"""`python -m npgpt.serve --model runs/<name>/classifier.h5`: the HTTP server (npgpt.cli.serve).

The app itself is `npgpt.http_api`, its batching `npgpt.batcher`. This module only hands over,
so that `python -m npgpt.serve` works like the other commands (`python -m npgpt.train`, ...).
"""
if __name__ == "__main__":      # `python -m npgpt.serve`: the command line, npgpt.cli.serve
    from npgpt.cli import hand_over
    hand_over("serve")
