"""An Ollama Modelfile beside a GGUF: FROM, the chat template as a Go template, stop tokens.

Ollama templates are Go templates, not Jinja, so the model's chat template is translated. We
render the Jinja template on a probe conversation and match the result against the shapes we
know (ChatML, Llama-3); a match gives the Go template for that shape. Any other template gets
the documented generic fallback: no TEMPLATE line, so Ollama uses its own detection on the
chat template stored in the GGUF's metadata (`tokenizer.chat_template`), and the Modelfile
says so in a comment. `PARAMETER stop` is written for every stop token either way.

Simplified on purpose: two template shapes (the common ones), no tool-call templates.
"""

from __future__ import annotations

PROBE = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "USER1"},
    {"role": "assistant", "content": "BOT1"},
    {"role": "user", "content": "USER2"},
]

CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
LLAMA3_GO = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def chatml_render(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def llama3_render(messages: list[dict]) -> str:
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
        for m in messages
    )
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# style name -> (reference renderer in Python, its Go template)
STYLES = {"chatml": (chatml_render, CHATML_GO), "llama3": (llama3_render, LLAMA3_GO)}


def detect_style(tokenizer) -> tuple[str | None, str]:
    """(style, literal prefix) when the chat template renders exactly like a known style
    after an optional prefix (e.g. `<|begin_of_text|>`), else (None, "")."""
    if not isinstance(tokenizer.chat_template, str):
        return None, ""
    try:
        rendered = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates may reject a system turn; then it is not a known style
        return None, ""
    for style, (render, _) in STYLES.items():
        body = render(PROBE)
        if rendered.endswith(body):
            return style, rendered[: -len(body)]
    return None, ""


def go_string(text: str) -> str:
    """A Modelfile value in triple quotes (Ollama's multi-line string syntax)."""
    if '"""' in text:
        raise ValueError(f"cannot quote {text!r} in a Modelfile")
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer, stops: list[str], bos_added: bool = False) -> str:
    """Modelfile text for `gguf_name` (a file in the same folder)."""
    style, prefix = detect_style(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if style is None:
        lines += [
            "# The chat template is not ChatML or Llama-3, so no TEMPLATE is written: Ollama",
            "# picks one from the chat template stored in the GGUF (tokenizer.chat_template).",
        ]
    else:
        # a prefix such as <|begin_of_text|> stays literal unless llama.cpp adds it as BOS
        literal = "" if bos_added and prefix == tokenizer.bos_token else prefix
        lines.append(f"TEMPLATE {go_string(literal + STYLES[style][1])}")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
