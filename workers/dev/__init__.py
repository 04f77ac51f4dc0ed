"""Development and demo tooling: local brokers (Tansu, Apache Kafka), Redis servers, the dev
stack, the TV-show demo and its trainer. Tests, benchmarks and the command line's ``demo`` and
``dev`` commands use it; the worker's runtime modules never import it (an import-linter contract
in CI checks that)."""
