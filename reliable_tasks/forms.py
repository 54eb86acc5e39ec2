"""Forms of the dead-task admin: how to requeue, what a bulk act covers, and arguments corrected
by an operator."""

from __future__ import annotations

import json
from typing import Any

from django import forms

from .conf import conf

KEEP = "keep"
RENEW = "renew"


class RequeueForm(forms.Form):
    """Whether a requeue runs under the dead task's idempotency key or a new one."""

    key = forms.ChoiceField(
        label="Idempotency key",
        choices=[
            (
                KEEP,
                "Keep the key: if an earlier run of this key completed, the task is not run again.",
            ),
            (RENEW, "Renew the key: run again as a new execution, with a new task id."),
        ],
        initial=KEEP,
        widget=forms.RadioSelect,
    )

    @property
    def renew_key(self) -> bool:
        return bool(self.cleaned_data["key"] == RENEW)


class BulkBoundForm(forms.Form):
    """The newest dead task a bulk confirmation counted: the act it confirms stops there.

    Dead tasks keep arriving while an operator reads the page; those are not part of the count
    the button showed. Ids are drawn in insertion order, so the highest id counted is the bound
    (only a capture that drew its id before the page and committed after it slips under it).
    It needs no signature: an operator who may act could as well widen the filter.
    """

    up_to = forms.IntegerField(min_value=0, widget=forms.HiddenInput)


class EditedArgumentsForm(RequeueForm):
    """New ``args`` and ``kwargs`` as JSON, checked before anything is written."""

    args = forms.CharField(
        label="Positional arguments (args)",
        required=False,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 8, "cols": 80, "spellcheck": "false"}),
        help_text='A JSON list, e.g. [42, "EUR"]. Empty means no positional arguments.',
    )
    kwargs = forms.CharField(
        label="Keyword arguments (kwargs)",
        required=False,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 8, "cols": 80, "spellcheck": "false"}),
        help_text='A JSON object, e.g. {"amount": 1250}. Empty means no keyword arguments.',
    )

    def clean_args(self) -> list[Any]:
        value = _parse(self.cleaned_data["args"], "The positional arguments", default=[])
        if not isinstance(value, list):
            raise forms.ValidationError(
                'The positional arguments must be a JSON list, like [42, "EUR"]; '
                f"this is a JSON {_kind(value)}.",
                code="not_a_list",
            )
        return value

    def clean_kwargs(self) -> dict[str, Any]:
        value = _parse(self.cleaned_data["kwargs"], "The keyword arguments", default={})
        if not isinstance(value, dict):
            raise forms.ValidationError(
                'The keyword arguments must be a JSON object, like {"amount": 1250}; '
                f"this is a JSON {_kind(value)}.",
                code="not_an_object",
            )
        return value

    def clean(self) -> dict[str, Any] | None:
        cleaned = super().clean()
        if cleaned is not None and "args" in cleaned and "kwargs" in cleaned:
            size = len(json.dumps([cleaned["args"], cleaned["kwargs"]]).encode())
            limit = int(conf.MAX_PAYLOAD_BYTES)
            if size > limit:
                raise forms.ValidationError(
                    f"The arguments are {size:,} bytes as JSON; the limit is "
                    f"RELIABLE_TASKS_MAX_PAYLOAD_BYTES = {limit:,} bytes.",
                    code="too_large",
                )
        return cleaned


def _parse(text: str, what: str, *, default: Any) -> Any:
    if not text:
        return default
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
        # What the database and the message take: text that is valid Unicode, without NUL.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise forms.ValidationError(
            f"{what} are not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from exc
    except RecursionError:
        raise forms.ValidationError(
            f"{what} are nested too deeply to be read; flatten them.", code="too_deep"
        ) from None
    except UnicodeEncodeError:
        raise forms.ValidationError(
            f"{what} hold a string that is not valid Unicode text (a lone surrogate such as "
            "\\ud800); remove it.",
            code="invalid_text",
        ) from None
    except ValueError as exc:
        raise forms.ValidationError(
            f"{what} are not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if _holds_nul(value):
        raise forms.ValidationError(
            f"{what} hold a NUL character (\\u0000), which the database cannot store; remove it.",
            code="invalid_text",
        )
    return value


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON, PostgreSQL's jsonb and workers do not.
    raise ValueError(f"{name} is not a JSON value; write a number or null.")


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
