"""UsersEdit against generated users files: every edit (add, set, rotate, remove) gives the
intended users, keeps the comments, and leaves the other users exactly as they were."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

import gateway

NAMES = st.sampled_from(["alice", "bob", "carol smith", "王芳", "d.e-f", "yes", "x_1"])
LIMIT = st.integers(0, 10**9)


def digest(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


@st.composite
def users_files(draw: st.DrawFn) -> tuple[str, dict[str, dict[str, object]]]:
    """A users.yaml written in one of several styles, and the entries it holds."""
    indent = draw(st.sampled_from([2, 4]))
    inner = draw(st.sampled_from([2, 4]))
    names = draw(st.lists(NAMES, unique=True, max_size=4))
    lines = ["# users of the team", "defaults:", "  daily_request_limit: 77  # default"]
    lines.append("users:" + draw(st.sampled_from(["", "  # who may call"])))
    model: dict[str, dict[str, object]] = {}
    for n, name in enumerate(names):
        entry: dict[str, object] = {"api_key_sha256": digest(name)}
        if draw(st.booleans()):
            entry["daily_token_limit"] = draw(LIMIT)
        if draw(st.booleans()):
            entry["enabled"] = draw(st.booleans())
        model[name] = entry
        key = gateway._yaml_name(name)
        if draw(st.booleans()):
            lines.append(" " * indent + f"# comment {n}")
        if draw(st.booleans()):  # flow style
            body = ", ".join(f"{k}: {str(v).lower()}" for k, v in entry.items())
            lines.append(" " * indent + f"{key}: {{{body}}}")
        else:
            lines.append(" " * indent + f"{key}:")
            for k, v in entry.items():
                tail = draw(st.sampled_from(["", "   # note"]))
                lines.append(" " * (indent + inner) + f"{k}: {str(v).lower()}{tail}")
        if draw(st.booleans()):
            lines.append("")
    if not names:
        lines[-1] += " {}" if draw(st.booleans()) else ""
    lines.append(draw(st.sampled_from(["# end", ""])))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"])), model


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "enabled", "requests", "tokens", "rotate", "remove"]), NAMES, LIMIT
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(users_files(), OPS)
def test_edits_give_the_intended_users_and_keep_comments(
    generated: tuple[str, dict[str, dict[str, object]]], ops: list[tuple[str, str, int]]
) -> None:
    text, model = generated
    edit = gateway.UsersEdit(text)
    for op, name, n in ops:
        if op == "add":
            if name in model:
                continue
            edit.add(name, {"api_key_sha256": digest(f"new {name}")})
            model[name] = {"api_key_sha256": digest(f"new {name}")}
            continue
        if name not in model:
            continue
        if op == "remove":
            edit.remove(name)
            del model[name]
            continue
        field, value = {
            "enabled": ("enabled", n % 2 == 0),
            "requests": ("daily_request_limit", n),
            "tokens": ("daily_token_limit", n),
            "rotate": ("api_key_sha256", digest(f"{name} {n}")),
        }[op]
        edit.set(name, field, str(value).lower() if isinstance(value, bool) else str(value))
        model[name][field] = value
    users = gateway.parse_users(edit.text)
    assert set(users) == set(model)
    for name, entry in model.items():
        u = users[name]
        assert u.key_sha256.hex() == entry["api_key_sha256"]
        assert u.enabled == entry.get("enabled", True)
        assert u.daily_request_limit == entry.get("daily_request_limit", 77)
        assert u.daily_token_limit == entry.get("daily_token_limit", 100000)
    kept = edit.text.splitlines()
    removed = any(op == "remove" for op, _, _ in ops)
    for line in text.splitlines():
        # Comments on lines of their own always stay; those at the end of a removed user's
        # lines go with them.
        if line.lstrip().startswith("#") or ("#" in line and not removed):
            assert any(line.split("#", 1)[1] in k for k in kept), line


POLICY_OPS = st.lists(
    st.tuples(
        st.sampled_from(["rpm", "models", "unset rpm", "unset models", "unset tokens"]),
        NAMES,
        st.integers(0, 10**6),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(users_files(), POLICY_OPS)
def test_policy_settings_set_and_unset_in_any_style(
    generated: tuple[str, dict[str, dict[str, object]]], ops: list[tuple[str, str, int]]
) -> None:
    """`user policy`'s edits: set a setting, or remove it (the default applies again), on
    block and flow entries alike; the other users and the comments stay as they were."""
    text, model = generated
    edit = gateway.UsersEdit(text)
    for op, name, n in ops:
        if name not in model:
            continue
        entry = model[name]
        if op == "rpm":
            edit.set(name, "rpm", str(n))
            entry["rpm"] = n
        elif op == "models":
            globs = [f"m{n}-*", "gpt-4o"][: n % 2 + 1]
            edit.set(name, "models", "[" + ", ".join(f'"{g}"' for g in globs) + "]")
            entry["models"] = tuple(globs)
        else:
            field = {"unset rpm": "rpm", "unset models": "models"}.get(op, "daily_token_limit")
            assert edit.unset(name, field) == (field in entry)
            entry.pop(field, None)
        gateway.parse_users(edit.text)  # valid after every single edit
    users = gateway.parse_users(edit.text)
    assert set(users) == set(model)
    for name, entry in model.items():
        u = users[name]
        assert u.key_sha256.hex() == entry["api_key_sha256"]
        assert u.enabled == entry.get("enabled", True)
        assert u.daily_token_limit == entry.get("daily_token_limit", 100000)
        assert u.policy.rpm == entry.get("rpm", 0)
        assert u.policy.models == entry.get("models", ("*",))
    kept = edit.text.splitlines()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            assert line in kept, line
