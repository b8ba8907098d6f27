# The pipeline's Python processes (worker, sink, CLI). Kafka and ClickHouse run as their own images.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
# The locked versions, hash-checked, then the project alone (the same recipe as `make setup`).
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pipeline ./pipeline
COPY schemas ./schemas
COPY producers ./producers
COPY stream_processors ./stream_processors
COPY sinks ./sinks
RUN pip install --no-cache-dir --no-deps --no-build-isolation .
# A non-root user owns the state folder (a named volume mounted there starts with its owner and mode).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/feedback feedback \
    && mkdir -p /var/lib/feedback/jsonl && chown -R feedback:feedback /var/lib/feedback \
    && chmod -R 0700 /var/lib/feedback
USER 10001:10001
ENV FEEDBACK_STATE_DIR=/var/lib/feedback FEEDBACK_PATH=/var/lib/feedback/jsonl
ENTRYPOINT ["feedback"]
