"""The deployment's files (docker-compose.yml and the Dockerfile at the repository root, Prometheus's and
Grafana's configuration here) and their tools: ``python -m deploy.check`` checks them against the code;
fetch_kafka_connector.py is the Dockerfile's step adding Spark's Kafka connector."""
