"""The stream: the worker's batch pipeline, Kafka in and out, the Faust app, settings and the
command line on top; dev/ holds the local services and the demo (docs/architecture.md)."""
