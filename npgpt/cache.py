"""`python -m npgpt.cache`: the command line of the frozen-prefix cache (npgpt.cli.cache; the
cache itself is npgpt.prefix_cache)."""

if __name__ == "__main__":
    from npgpt.cli import hand_over
    hand_over("cache")
