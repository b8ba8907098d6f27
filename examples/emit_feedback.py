"""A service emitting feedback with the typed client.

Run against the local stack (``make up``) or any cluster set in FEEDBACK_* variables:

    .venv/bin/python examples/emit_feedback.py
"""

from __future__ import annotations

from producers.client import FeedbackClient


def main() -> None:
    with FeedbackClient("dream_ui", model_version="m-2026.11", prompt_version="p-b") as fb:
        sent = [
            fb.thumbs(up=False, interaction_id="i-1001", user_id="u-42", comment="The citation is wrong"),
            fb.rating(4, interaction_id="i-1002", user_id="u-42"),
            fb.correction("Canberra is the capital of Australia.", interaction_id="i-1003", user_id="u-7"),
            fb.implicit("copy", interaction_id="i-1004", user_id="u-7"),
            fb.bad_output(severity="error", detail="hallucinated a paper", interaction_id="i-1005"),
            fb.latency(5400, interaction_id="i-1006"),
            fb.veto("unsafe_advice", interaction_id="i-1007"),
        ]
        regret = fb.regret_tap(-0.7, {"turn": 4})
        if regret is not None:
            sent.append(regret)
    # Leaving the block waited for Kafka: every event below is acknowledged.
    for event in sent:
        print(f"{event.type:<13} {event.event_id}")


if __name__ == "__main__":
    main()
