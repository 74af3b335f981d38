"""`lorag train --serve URL`: hot-load the new adapter into a running daemon."""

from pathlib import Path

import httpx

from lorag.daemon_errors import daemon_error


def publish(url: str, name: str, adapter: Path, api_key: str | None = None) -> str:
    """Register `adapter` as `name` through the daemon's vLLM-compatible load route and
    return a one-line curl that uses it. The daemon's refusal is raised with its message."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"lora_name": name, "lora_path": str(Path(adapter).resolve())}
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/load_lora_adapter", json=body,
                              headers=headers, timeout=60)
    except httpx.HTTPError as e:
        raise RuntimeError(f"cannot reach the daemon at {url}: {e}") from e
    if response.status_code != 200:
        raise daemon_error(response, f"the daemon at {url} refused the adapter")
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (f"curl -s {url.rstrip('/')}/v1/chat/completions -H 'Content-Type: "
            f"application/json'{auth} -d '{{\"model\": \"{name}\", \"messages\": "
            "[{\"role\": \"user\", \"content\": \"Hello\"}]}'")
