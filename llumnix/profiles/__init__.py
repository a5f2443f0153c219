"""Step-time profiles of one LLM instance: prefill, decode and KV-migration costs for the simulator."""

from llumnix.profiles.profile import (
    BlockingCopyFit,
    BlockingCopyPoint,
    DecodeFit,
    DecodePoint,
    PrefillFit,
    PrefillPoint,
    Profile,
    ProfileError,
    list_profiles,
)

DEFAULT_PROFILE = "a10-llama-7b"

__all__ = [
    "DEFAULT_PROFILE",
    "BlockingCopyFit",
    "BlockingCopyPoint",
    "DecodeFit",
    "DecodePoint",
    "PrefillFit",
    "PrefillPoint",
    "Profile",
    "ProfileError",
    "list_profiles",
]
