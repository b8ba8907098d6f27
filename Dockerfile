# The pipeline's Python processes (worker, sink, CLI). Kafka and ClickHouse run as their own images.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY schemas ./schemas
COPY producers ./producers
COPY stream_processors ./stream_processors
COPY sinks ./sinks
RUN pip install --no-cache-dir .
ENV FEEDBACK_STATE_DIR=/var/lib/feedback FEEDBACK_PATH=/var/lib/feedback/jsonl
ENTRYPOINT ["feedback"]
