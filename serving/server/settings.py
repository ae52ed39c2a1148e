"""The HTTP server's own limits and trust settings (the engine's live in EngineConfig).

Every limit here bounds what one request can cost the others: how many sequences it fans out to,
how much text is tokenised for it, how long a health probe or a weight-group rendezvous may take,
and how long shutdown may wait. `add_server_args` / `ServerSettings.from_args` are the CLI side.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Limits and trust settings of one server.

    max_n: largest `sampling_params.n` a request may ask for (SGLang has no bound; one request
      must not fill the batch on its own).
    max_text_chars: longest `text` (per prompt) the server tokenises; tokenising runs in a worker
      thread, never on the event loop.
    max_json_depth: deepest JSON nesting a body may have (our bodies need 4).
    health_generate_timeout_s: `/health_generate` answers 503 when one token does not arrive
      within this time.
    weight_group_timeout_s: bound of the `/init_weights_update_group` rendezvous.
    shutdown_grace_s: SIGTERM waits this long for in-flight requests, then closes them; the
      process exits by `2 * shutdown_grace_s + 5` seconds whatever the engine is doing.
    allowed_origins: browser origins allowed besides this server's own (`*` allows any).
    allowed_hosts: Host header values allowed besides loopback names, the bound address and this
      machine's names (`*` allows any); refusing others defeats DNS rebinding.
    unsafe_pickle: unpickle `/update_weights_from_tensor` payloads without the allow-list (only
      for trainers that send objects other than tensors; code in the payload then runs).
    """

    max_n: int = 256
    max_text_chars: int = 1_000_000
    max_json_depth: int = 32
    health_generate_timeout_s: float = 5.0
    weight_group_timeout_s: float = 30.0
    shutdown_grace_s: float = 5.0
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    unsafe_pickle: bool = False

    def __post_init__(self) -> None:
        for name in ("max_n", "max_text_chars", "max_json_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerSettings.{name}: must be an int >= 1")
        for name in ("health_generate_timeout_s", "weight_group_timeout_s", "shutdown_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerSettings.{name}: must be > 0")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        return cls(
            max_n=args.max_n,
            max_text_chars=args.max_text_chars,
            health_generate_timeout_s=args.health_generate_timeout,
            weight_group_timeout_s=args.weight_group_timeout,
            shutdown_grace_s=args.shutdown_grace,
            allowed_origins=tuple(args.allowed_origins or ()),
            allowed_hosts=tuple(args.allowed_hosts or ()),
            unsafe_pickle=args.unsafe_pickle,
        )


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The `rollout serve` flags for ServerSettings (defaults are the dataclass's)."""
    d = ServerSettings()
    group = parser.add_argument_group("server limits and trust")
    group.add_argument("--max-n", type=int, default=d.max_n, help="largest sampling_params.n")
    group.add_argument(
        "--max-text-chars", type=int, default=d.max_text_chars, help="longest text prompt"
    )
    group.add_argument(
        "--health-generate-timeout",
        type=float,
        default=d.health_generate_timeout_s,
        help="seconds /health_generate waits for one token before answering 503",
    )
    group.add_argument(
        "--weight-group-timeout",
        type=float,
        default=d.weight_group_timeout_s,
        help="seconds /init_weights_update_group waits for the trainer's rendezvous",
    )
    group.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace_s,
        help="seconds SIGTERM waits for in-flight requests before closing them",
    )
    group.add_argument(
        "--allowed-origins",
        nargs="*",
        default=[],
        help="browser Origins allowed to call the server ('*' for any)",
    )
    group.add_argument(
        "--allowed-hosts",
        nargs="*",
        default=[],
        help="extra Host header values accepted ('*' for any)",
    )
    group.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="unpickle weight payloads without the tensor allow-list (runs code they carry)",
    )
