"""Thin producers: the Python client that publishes FeedbackEvents to Kafka."""

from producers.producer import DeliveryError, FeedbackProducer, subject_key

__all__ = ["DeliveryError", "FeedbackProducer", "subject_key"]
