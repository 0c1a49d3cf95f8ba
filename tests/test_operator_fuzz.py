"""Property test: the reconciler's pure parts never raise on a spec the API server could store.

Specs are generated from the CRD's own OpenAPI schema (types, enums, patterns, bounds, required fields;
not its CEL rules, so many are specs the API server would refuse, which is harder). For each, the pass's
pure steps run as :meth:`Reconciler._sync` runs them: defaults, the spec check, and, when the spec renders,
every manifest. The only failure allowed is the intended one: ``check_spec`` saying what is wrong.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmgw_common.providers import TYPES
from llmgw_operator import manifests
from llmgw_operator.reconcile import check_spec, grpc_weight, next_config_generation
from llmgw_operator.spec import crd, referenced_secrets, with_defaults

SPEC_SCHEMA: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
META = {"name": "gw", "namespace": "team-a", "uid": "0000-1111", "generation": 1}
UNION = tuple(TYPES)  # a provider's type: one member block
# Names that collide often, so routes name providers that exist and specs render more than rarely.
POOL = [
    "a",
    "b",
    "demo",
    "openai",
    "vllm",
    "token",
    "api-key",
    "gpt-*",
    "*",
    "http://127.0.0.1:9",
    "10s",
    "1m",
]


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    most = min(schema.get("maxLength", 40), 40)
    least = schema.get("minLength", 0)
    pattern = schema.get("pattern")
    if pattern:
        regex = re.compile(pattern)
        pooled = [v for v in POOL if regex.fullmatch(v) and least <= len(v) <= most]
        generated = st.from_regex(regex, fullmatch=True, alphabet=st.characters(codec="ascii")).filter(
            lambda v: least <= len(v) <= most
        )
        return st.one_of(st.sampled_from(pooled), generated) if pooled else generated
    return st.one_of(
        st.sampled_from([v for v in POOL if least <= len(v) <= most]), st.text(min_size=least, max_size=most)
    )


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if schema.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 100), st.sampled_from(["25%", "1", "100%", "0"]))
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        if not properties:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                return st.dictionaries(st.sampled_from(POOL[:6]), from_schema(extra), max_size=2)
            return st.just({})
        required = set(schema.get("required", []))
        union = [k for k in UNION if k in properties]
        if union:  # the CRD's CEL rule: exactly one member (mostly kept, so that specs render)
            return st.sampled_from(union).flatmap(
                lambda member: st.fixed_dictionaries(
                    {k: from_schema(v) for k, v in properties.items() if k in required or k == member},
                    optional={
                        k: from_schema(v)
                        for k, v in properties.items()
                        if k not in required and k not in union
                    },
                )
            )
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in properties.items() if k in required},
            optional={k: from_schema(v) for k, v in properties.items() if k not in required},
        )
    if kind == "array":
        least = schema.get("minItems", 0)
        return st.lists(
            from_schema(schema["items"]),
            min_size=least,
            max_size=max(least, min(schema.get("maxItems", 3), 3)),
        )
    if kind == "string":
        return _string(schema)
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**31)), schema.get("maximum", 2**31))
    if kind == "number":
        return st.floats(schema.get("minimum", -1e9), schema.get("maximum", 1e9), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    return st.none()


@st.composite
def wired_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A generated spec whose routes mostly name its own providers on the right path (as the CRD's CEL rules
    demand), so that most specs get past the check to the manifests instead of stopping at a dangling name."""
    raw: dict[str, Any] = draw(from_schema(SPEC_SCHEMA))
    providers = [p for p in raw.get("providers") or [] if isinstance(p, dict) and "name" in p]
    seen: set[str] = set()
    providers = [p for p in providers if not (p["name"] in seen or seen.add(p["name"]))]
    raw["providers"] = providers or raw.get("providers", [])
    rest = [p["name"] for p in providers if any(TYPES[t].path == "rest" for t in TYPES if t in p)]
    grpc = [p["name"] for p in providers if any(TYPES[t].path == "grpc" for t in TYPES if t in p)]
    if draw(st.sampled_from([False] * 9 + [True])) or not (rest or grpc):
        return raw  # one in ten left as generated: dangling names must be refused, not raise
    routes = []
    for route in raw.get("routes") or []:
        route = {k: v for k, v in route.items() if k not in ("rest", "grpc")}
        if rest and draw(st.booleans()):
            route["rest"] = draw(st.sampled_from(rest))
        if grpc and ("rest" not in route or draw(st.booleans())):
            route["grpc"] = draw(st.sampled_from(grpc))
        if "rest" not in route and "grpc" not in route:
            route["rest"] = draw(st.sampled_from(rest))
        routes.append(route)
    raw["routes"] = routes
    return raw


RENDERED: list[bool] = []


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=wired_specs(), status_weight=st.integers(0, 100))
def test_generated_specs_never_raise_but_the_spec_check(raw: dict[str, Any], status_weight: int) -> None:
    spec = with_defaults(raw)
    weight = grpc_weight(spec, {"migration": {"weight": status_weight}})
    referenced_secrets(spec)
    rendered, error = check_spec(spec, weight)
    RENDERED.append(rendered is not None)
    if rendered is None:
        assert error and error.startswith("spec does not render")
        return
    assert error is None
    rendered["generation"] = next_config_generation(None, rendered, 0)
    text = manifests.render_config(rendered)
    assert yaml.safe_load(text)["generation"] == 1
    manifests.build_config_map(META, text)
    manifests.build_service_account(META)
    manifests.build_service(META, spec)
    manifests.build_pod_disruption_budget(META, spec)
    manifests.build_deployment(META, spec, "llmgw-proxy:test", manifests.secrets_hash({"s": "1"}))


def test_most_generated_specs_reach_the_manifests() -> None:
    """The property above is worth something only if many generated specs render (it runs first)."""
    assert len(RENDERED) >= 100
    assert sum(RENDERED) >= len(RENDERED) // 4, f"{sum(RENDERED)} of {len(RENDERED)} specs rendered"


@settings(max_examples=300, deadline=None)
@given(
    live=st.one_of(
        st.text(max_size=80),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=5) | st.booleans(),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
            max_leaves=8,
        ).map(yaml.safe_dump),
    )
)
def test_a_hand_edited_config_map_never_breaks_the_generation(live: str) -> None:
    """Whatever someone writes into the ConfigMap, the next generation is a number."""
    generation = next_config_generation(live, {"generation": 0, "routes": []}, 3)
    assert isinstance(generation, int) and not isinstance(generation, bool)
