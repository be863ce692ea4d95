"""Realistic, distinct KonPro deliveries for the publish ceiling (shaped like post_events.lua's)."""

from __future__ import annotations

import json

EVENT_TYPES = (
    "avatar_video.success",
    "avatar_video.fail",
    "video_translate.success",
    "video_translate.fail",
    "personalized_video",
)


def make_event(run_id: str, worker: int, counter: int) -> tuple[str, bytes, str]:
    """Return ``(event_type, body, event_id)`` for the ``counter``-th event of ``worker``."""
    uid = f"{run_id}-{worker}-{counter}"
    event_type = EVENT_TYPES[counter % len(EVENT_TYPES)]
    data: dict[str, object]
    if event_type == "avatar_video.success":
        data = {
            "video_id": uid,
            "url": f"https://resource.konpro.ai/video/{uid}.mp4?Expires=1767225600&Signature=Zm9v",
            "gif_download_url": f"https://resource.konpro.ai/gif/{uid}.gif",
            "video_share_page_url": f"https://app.konpro.ai/share/{uid}",
            "folder_id": "f-2024-campaign",
            "callback_id": f"cb-{uid}",
            "duration": 31.52,
        }
    elif event_type == "avatar_video.fail":
        data = {
            "video_id": uid,
            "msg": f"Avatar rendering failed: voice clip too long ({uid})",
            "error_code": 400140,
            "callback_id": f"cb-{uid}",
            "detail": "retry with a shorter script",
        }
    elif event_type.startswith("video_translate."):
        data = {
            "video_translate_id": uid,
            "url": f"https://resource.konpro.ai/translate/{uid}.mp4",
            "output_language": "Spanish",
            "callback_id": f"cb-{uid}",
            "title": f"Quarterly update {uid}",
        }
    else:
        data = {
            "project_id": f"p-{uid}",
            "video_id": uid,
            "status": "completed",
            "callback_id": f"cb-{uid}",
            "url": f"https://resource.konpro.ai/personalized/{uid}.mp4",
        }
    body = json.dumps({"event_type": event_type, "event_data": data}).encode()
    return event_type, body, f"evt-{uid}"
