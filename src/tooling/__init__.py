"""Local tooling, never shipped to Lambda: the `matchmaker` CLI, the local stack (serve),
smoke, bench, synthetic data, development tokens, file import and the oracle."""
