"""Checks across sections: names that must refer to something configured elsewhere.

They run on the raw (interpolated) data, also when pydantic found problems, so that every problem
is reported at once. Anything missing or malformed is skipped: pydantic reports it already. A value
that came from the environment or a file is never named in a message.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .problems import Finding, Loc

__all__ = ["cross_check"]


@dataclass(frozen=True)
class _Served:
    """A model id as listed under ``upstreams.<upstream>.models[<index>]``."""

    upstream: object
    index: int
    model: str

    @property
    def loc(self) -> Loc:
        return ("upstreams", self.upstream, "models", self.index)


def cross_check(data: object, secret: Collection[Loc]) -> list[Finding]:
    """Findings for aliases, team model lists, pricing keys and key ids that do not add up.

    ``secret`` holds the positions of interpolated values, which messages must not show.
    """
    if not isinstance(data, dict):
        return []
    checker = _Checker(data, secret)
    checker.models_and_keys()
    checker.aliases()
    checker.references()
    checker.api_keys()
    checker.budgets()
    return checker.findings


class _Checker:
    def __init__(self, data: dict[object, object], secret: Collection[Loc]) -> None:
        self.data = data
        self.secret = secret
        self.findings: list[Finding] = []
        upstreams = data.get("upstreams")
        self.upstreams = upstreams if isinstance(upstreams, dict) else None
        self.served: dict[str, _Served] = {}
        self.listed: dict[object, list[_Served]] = {}
        self.complete = self.upstreams is not None
        aliases = data.get("models")
        self.aliases_map = aliases if isinstance(aliases, dict) else {}

    def show(self, loc: Loc, value: str) -> str:
        return "the interpolated value" if loc in self.secret else repr(value)

    def listing(self, served: list[_Served]) -> str:
        names = [s.model for s in served if s.loc not in self.secret]
        return ", ".join(names) if names else ("none shown" if served else "none")

    def models_and_keys(self) -> None:
        """Model ids are unique across all upstreams; key ids are unique within one."""
        for name, upstream in (self.upstreams or {}).items():
            if not isinstance(upstream, dict):
                self.complete = False
                continue
            models = upstream.get("models")
            if not isinstance(models, list):
                self.complete = False
            else:
                self._models(name, models)
            keys = upstream.get("keys")
            if isinstance(keys, list):
                self._key_ids(name, keys)

    def _models(self, upstream: object, models: list[object]) -> None:
        for index, entry in enumerate(models):
            model = entry.get("id") if isinstance(entry, dict) else entry
            if not isinstance(model, str):
                continue
            served = _Served(upstream, index, model)
            loc = served.loc
            self.listed.setdefault(upstream, []).append(served)
            first = self.served.get(model)
            if first is None:
                self.served[model] = served
            elif first.upstream == upstream:
                self.findings.append(
                    Finding(
                        loc,
                        f"model {self.show(loc, model)} is listed twice (also at [{first.index}])",
                    )
                )
            else:
                self.findings.append(
                    Finding(
                        loc,
                        f"model {self.show(loc, model)} is already served by upstream "
                        f"{first.upstream!r}; routing would be ambiguous "
                        "(list each model id under one upstream only)",
                    )
                )

    def _key_ids(self, upstream: object, keys: list[object]) -> None:
        seen: dict[str, int] = {}
        for index, key in enumerate(keys):
            key_id = key.get("id") if isinstance(key, dict) else None
            if not isinstance(key_id, str):
                continue
            loc: Loc = ("upstreams", upstream, "keys", index, "id")
            if key_id in seen:
                self.findings.append(
                    Finding(
                        loc,
                        f"duplicate key id {self.show(loc, key_id)} (also keys[{seen[key_id]}]); "
                        "key ids must be unique within an upstream",
                    )
                )
            else:
                seen[key_id] = index

    def aliases(self) -> None:
        """An alias has its own name and points at a model its upstream serves."""
        for name, alias in self.aliases_map.items():
            owner = self.served.get(name) if isinstance(name, str) else None
            if owner is not None:
                self.findings.append(
                    Finding(
                        ("models", name),
                        f"alias {name!r} has the name of a model of upstream "
                        f"{owner.upstream!r}; choose another alias name",
                    )
                )
            if isinstance(alias, dict):
                self._alias_target(name, alias)

    def _alias_target(self, name: object, alias: dict[object, object]) -> None:
        upstream, model = alias.get("upstream"), alias.get("model")
        if self.upstreams is None or not isinstance(upstream, str):
            return
        up_loc: Loc = ("models", name, "upstream")
        if upstream not in self.upstreams:
            configured = ", ".join(str(key) for key in self.upstreams)
            self.findings.append(
                Finding(
                    up_loc,
                    f"unknown upstream {self.show(up_loc, upstream)} (configured: {configured})",
                )
            )
            return
        target = self.upstreams[upstream]
        if not isinstance(model, str) or not isinstance(target, dict):
            return
        if not isinstance(target.get("models"), list):
            return
        own = self.listed.get(upstream, [])
        if any(s.model == model for s in own):
            return
        loc: Loc = ("models", name, "model")
        message = f"upstream {upstream!r} does not serve {self.show(loc, model)}"
        elsewhere = self.served.get(model)
        if elsewhere is not None and loc not in self.secret:
            message += f"; upstream {elsewhere.upstream!r} does"
        self.findings.append(Finding(loc, f"{message} (its models: {self.listing(own)})"))

    def references(self) -> None:
        """Team model lists and pricing keys name model ids or aliases."""
        if not self.complete:
            return
        known = [*self.served, *(a for a in self.aliases_map if isinstance(a, str))]
        teams = self.data.get("teams")
        for team, settings in teams.items() if isinstance(teams, dict) else ():
            models = settings.get("models") if isinstance(settings, dict) else None
            for index, model in enumerate(models if isinstance(models, list) else ()):
                if isinstance(model, str) and model not in known:
                    self._unknown(("teams", team, "models", index), model, known)
        pricing = self.data.get("pricing")
        for model in pricing if isinstance(pricing, dict) else ():
            if isinstance(model, str) and model not in known:
                self._unknown(("pricing", model), model, known)

    def api_keys(self) -> None:
        """A key belongs to a configured team; its models are known and among the team's."""
        auth = self.data.get("auth")
        keys = auth.get("api_keys") if isinstance(auth, dict) else None
        if not isinstance(keys, list):
            return
        teams = self.data.get("teams")
        teams = teams if isinstance(teams, dict) else {}
        known = [*self.served, *(a for a in self.aliases_map if isinstance(a, str))]
        ids: dict[object, int] = {}
        hashes: dict[object, int] = {}
        for index, key in enumerate(keys):
            if not isinstance(key, dict):
                continue
            base: Loc = ("auth", "api_keys", index)
            for field, seen in (("id", ids), ("hash", hashes)):
                value = key.get(field)
                if isinstance(value, str) and value in seen:
                    self.findings.append(
                        Finding(
                            (*base, field),
                            f"duplicate key {field} (also api_keys[{seen[value]}])",
                        )
                    )
                elif isinstance(value, str):
                    seen[value] = index
            team = key.get("team")
            if isinstance(team, str) and team not in teams:
                configured = ", ".join(str(name) for name in teams) or "none"
                self.findings.append(
                    Finding(
                        (*base, "team"),
                        f"team {self.show((*base, 'team'), team)} is not configured under "
                        f"teams (configured: {configured})",
                    )
                )
                continue
            self._key_models(base, key.get("models"), teams.get(team), known)

    def _key_models(self, base: Loc, models: object, team: object, known: list[str]) -> None:
        if not isinstance(models, list):
            return
        team_models = team.get("models") if isinstance(team, dict) else None
        for index, model in enumerate(models):
            loc = (*base, "models", index)
            if not isinstance(model, str):
                continue
            if self.complete and model not in known:
                self._unknown(loc, model, known)
            elif isinstance(team_models, list) and model not in team_models:
                self.findings.append(
                    Finding(loc, f"{self.show(loc, model)} is not among the team's models")
                )

    def budgets(self) -> None:
        """Every model a budgeted team can reach has a price; per-key limits name its keys."""
        teams = self.data.get("teams")
        if not isinstance(teams, dict) or not self.complete:
            return
        pricing = self.data.get("pricing")
        priced = set(pricing) if isinstance(pricing, dict) else set()
        auth = self.data.get("auth")
        keys = auth.get("api_keys") if isinstance(auth, dict) else None
        key_teams = {key.get("id"): key.get("team") for key in keys or () if isinstance(key, dict)}
        for team, settings in teams.items():
            if not isinstance(settings, dict):
                continue
            per_key = settings.get("keys")
            per_key = per_key if isinstance(per_key, dict) else {}
            for key_id in per_key:
                if key_teams.get(key_id) != team:
                    self.findings.append(
                        Finding(
                            ("teams", team, "keys", key_id),
                            f"{key_id!r} is not an API key of team {team!r}",
                        )
                    )
            budgeted = settings.get("budget") is not None or any(
                isinstance(limits, dict) and limits.get("budget") is not None
                for limits in per_key.values()
            )
            if budgeted:
                self._priced(team, settings.get("models"), priced)

    def _priced(self, team: object, models: object, priced: set[object]) -> None:
        reachable = models if isinstance(models, list) else [*self.served, *self.aliases_map]
        missing = []
        for model in reachable:
            alias = self.aliases_map.get(model)
            target = alias.get("model") if isinstance(alias, dict) else None
            if model not in priced and target not in priced:
                missing.append(str(model))
        if missing:
            self.findings.append(
                Finding(
                    ("teams", team, "budget"),
                    f"team {team!r} has a budget but no price for: {', '.join(missing)} "
                    "(add them under pricing)",
                )
            )

    def _unknown(self, loc: Loc, name: str, known: list[str]) -> None:
        message = (
            f"unknown model {self.show(loc, name)}: neither a model id of an upstream nor an alias"
        )
        if loc not in self.secret:
            visible = [
                k for k in known if k not in self.served or self.served[k].loc not in self.secret
            ]
            import difflib  # here: only a config with an unknown model needs it

            close = difflib.get_close_matches(name, visible, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        self.findings.append(Finding(loc, message))
