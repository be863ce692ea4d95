"""Realistic KonPro deliveries for every documented event type, each with fresh ids.

The shapes follow KonPro's documentation and captured deliveries (several fields null, as KonPro
sends them), so that what ``send-test-event`` produces looks to a consumer like the real thing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson

EventData = dict[str, Any]

_RESOURCES: Final = "https://resource.konpro.example"


def _id() -> str:
    return uuid.uuid4().hex


def _avatar_video_success() -> EventData:
    video_id = _id()
    return {
        "video_id": video_id,
        "url": f"{_RESOURCES}/video/{video_id}/1280x720.mp4?Expires=1893456000&Signature=test",
        "gif_download_url": None,
        "video_share_page_url": f"https://app.konpro.example/share/{video_id}",
        "folder_id": "",
        "callback_id": f"test-{_id()[:8]}",
    }


def _avatar_video_fail() -> EventData:
    return {
        "video_id": _id(),
        "msg": "Avatar render failed: the script audio is empty",
        "callback_id": f"test-{_id()[:8]}",
    }


def _avatar_video_gif_success() -> EventData:
    data = _avatar_video_success()
    data["gif_download_url"] = f"{_RESOURCES}/gif/{data['video_id']}.gif"
    return data


def _video_translate_success() -> EventData:
    translate_id = _id()
    return {
        "video_translate_id": translate_id,
        "url": f"{_RESOURCES}/translate/{translate_id}/de.mp4",
        "callback_id": None,
        "output_language": "German",
    }


def _video_translate_fail() -> EventData:
    return {
        "video_translate_id": _id(),
        "message": "The source video has no detectable speech",
        "callback_id": None,
        "output_language": "French",
    }


def _personalized_video() -> EventData:
    project_id, video_id = _id(), _id()
    return {
        "project_id": project_id,
        "video_id": video_id,
        "video_url": f"{_RESOURCES}/personalized/{video_id}.mp4",
        "landing_page_url": f"https://app.konpro.example/p/{project_id}/{video_id}",
        "gif_url": f"{_RESOURCES}/personalized/{video_id}.gif",
        "gif_html": f'<a href="https://app.konpro.example/p/{video_id}"><img src="x.gif"></a>',
        "contact_info": {"first_name": "Ada", "email": "ada@example.com"},
    }


def _generic() -> EventData:
    """For a type KonPro has not documented: the bridge forwards whatever data it carries."""
    return {"id": _id(), "callback_id": None, "note": "test event from konpro-bridge"}


SAMPLES: Final[dict[str, Callable[[], EventData]]] = {
    "avatar_video.success": _avatar_video_success,
    "avatar_video.fail": _avatar_video_fail,
    "avatar_video_gif.success": _avatar_video_gif_success,
    "avatar_video_gif.fail": _avatar_video_fail,
    "video_translate.success": _video_translate_success,
    "video_translate.fail": _video_translate_fail,
    "personalized_video": _personalized_video,
}


def sample_event(event_type: str) -> dict[str, Any]:
    """A fresh envelope ``{"event_type", "event_data"}``; unknown types get generic data."""
    return {"event_type": event_type, "event_data": SAMPLES.get(event_type, _generic)()}


def sample_body(event_type: str) -> bytes:
    """``sample_event`` as the JSON bytes KonPro would POST."""
    return orjson.dumps(sample_event(event_type))
