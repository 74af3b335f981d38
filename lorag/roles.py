"""The roles of a chat's messages, one set for the chats lorag serves and the chats it
trains on, as OpenAI names them. A developer message is a system message (OpenAI renamed
the role): both read it as one."""

ROLES = ("system", "developer", "user", "assistant")


def canonical(role: str) -> str:
    """The role a chat template renders: `developer` is `system`."""
    return "system" if role == "developer" else role
