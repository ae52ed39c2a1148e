"""The plugin's runtime for one slime run (one `args`): engine pool from the router's workers,
controller, planner, reward, filter and payload hooks; `train` runs one rollout step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rollout_accel.rollout.controller import RolloutController
from rollout_accel.rollout.partial_buffer import PartialBuffer
from rollout_accel.rollout.pool import EnginePool, HttpEngine, expand_router
from rollout_accel.rollout.rewards import RewardFn, load_reward
from rollout_accel.rollout.sample_types import (
    SLIME_AVAILABLE,
    RolloutFnTrainOutput,
    Sample,
)
from rollout_accel.rollout.slime.data_source import DataSource, SlimePromptSource, _load_object
from rollout_accel.rollout.slime.evaluation import EvaluationMixin
from rollout_accel.rollout.slime.filters import _FilterAdapter
from rollout_accel.rollout.slime_settings import (
    SlimeSettings,
    SlimeSettingsError,
)
from rollout_accel.sampling import RolloutPlanner

if TYPE_CHECKING:
    from rollout_accel.rollout.slime.background import _Plugin

log = logging.getLogger(__name__)
Group = list[Sample]


# -- the runtime ---------------------------------------------------------------------------------
class _Runtime(EvaluationMixin):
    """Pool + controller + planner for one slime run (one `args`); lives on the loop thread."""

    def __init__(self, args: Any, settings: SlimeSettings, plugin: _Plugin) -> None:
        self.args = args
        self.settings = settings
        self.plugin = plugin
        self.urls: list[str] = []
        self.pool: EnginePool | None = None
        self.planner: RolloutPlanner | None = None
        self.reward = self._reward()
        self.filter: _FilterAdapter | None = None
        cfg = settings.controller
        if settings.dynamic_filter_path and cfg.dynamic_filter is not False:
            self.filter = _FilterAdapter(
                args, _load_object(settings.dynamic_filter_path, "--dynamic-sampling-filter-path")
            )
        self.user_hook = (
            _load_object(settings.payload_hook, "accel_payload_hook")
            if settings.payload_hook
            else None
        )
        self.controller: RolloutController | None = None
        self._own_buffer = PartialBuffer(cfg.max_staleness, cfg.stale_action)
        self._sources: dict[int, SlimePromptSource] = {}
        self._eval_cache: dict[tuple[str, str], list[Sample]] = {}
        self._eval_rewards: dict[str, RewardFn] = {}
        self._warned = False

    @classmethod
    async def create(cls, args: Any, settings: SlimeSettings, plugin: _Plugin) -> _Runtime:
        self = cls(args, settings, plugin)
        await self.refresh_engines()
        if settings.planner is not None:
            store = plugin.store(plugin.history_path(args))
            self.planner = RolloutPlanner(store, settings.planner)
        self.controller = RolloutController(
            self.pool,
            SlimePromptSource(args, None),
            self.reward,
            settings.controller,
            planner=self.planner,
            payload_hook=self._hook,
            group_filter=self.filter,
        )
        # slime's Sample.append_response_tokens reads its args (speculative stats, experts).
        self.controller.slime_args = args
        return self

    def _reward(self) -> RewardFn:
        """accel_reward, else slime's reward dispatch (--custom-rm-path, --rm-type), else
        --custom-rm-path loaded directly where slime is not importable."""
        if self.settings.reward:
            return load_reward(self.settings.reward, self.args)
        if SLIME_AVAILABLE:  # pragma: no cover - needs slime
            from slime.rollout.rm_hub import async_rm

            return load_reward(async_rm, self.args)
        path = getattr(self.args, "custom_rm_path", None)
        if path:
            return load_reward(path, self.args)
        raise SlimeSettingsError(
            "reward: none configured; set --custom-rm-path (or accel_reward; --rm-type needs slime)"
        )

    def _hook(
        self, sample: Sample, payload: dict[str, Any], n: int | None = None
    ) -> dict[str, Any]:
        seed = self.settings.deterministic_seed
        if seed is not None:  # slime's deterministic inference: one seed per position in group
            n = n or self.settings.controller.n_samples_per_prompt
            payload["sampling_params"]["sampling_seed"] = seed + (sample.index or 0) % n
        return self.user_hook(sample, payload) if self.user_hook else payload

    async def refresh_engines(self) -> None:
        """(Re)lists the router's workers; a changed list (engines recovered, added) gets a
        fresh pool. Requests go to workers directly so an abort reaches every one of them."""
        if self.settings.engine_urls is not None:
            urls = list(self.settings.engine_urls)
        else:
            urls = await expand_router(self.settings.router_url)
        if urls == self.urls and self.pool is not None:
            return
        old = self.pool
        self.urls = urls
        self.pool = EnginePool(
            [HttpEngine(u) for u in urls], concurrency_per_engine=self.settings.concurrency
        )
        if self.controller is not None:
            self.controller.pool = self.pool
        if old is not None:
            await old.close()

    async def train(self, rollout_id: int, data_source: Any) -> RolloutFnTrainOutput:
        await self.refresh_engines()
        ctl = self.controller
        source = self._sources.get(id(data_source))
        if source is None or source.data_source is not data_source:
            source = self._sources[id(data_source)] = SlimePromptSource(self.args, data_source)
        ctl.source = source
        # Our DataSource owns the buffer so it is checkpointed with slime; others: in memory.
        if isinstance(data_source, DataSource):
            ctl.buffer = data_source.buffer
        else:
            if self.settings.controller.keeps_partials and not self._warned:
                log.warning(
                    "rollout_accel: partial groups are kept in memory only; use "
                    "--data-source-path rollout_accel.rollout.slime.DataSource to checkpoint them"
                )
                self._warned = True
            ctl.buffer = self._own_buffer
        if self.filter is not None:
            self.filter.drops.clear()
        out = await ctl.step(rollout_id)
        target = self.settings.controller.rollout_batch_size
        if len(out.groups) != target:
            raise RuntimeError(
                f"rollout {rollout_id}: the data source ran out ({len(out.groups)} of {target} groups)"
            )
        groups = sorted(out.groups, key=lambda g: g[0].index if g[0].index is not None else -1)
        metrics: dict[str, Any] = dict(out.metrics)
        metrics["accel/engines"] = float(len(self.urls))
        if self.filter is not None:
            metrics.update(
                {f"rollout/dynamic_filter/drop_{r}": c for r, c in self.filter.drops.items()}
            )
        return RolloutFnTrainOutput(samples=groups, metrics=metrics)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
