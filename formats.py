"""Checkpoint format versions: what each one changed, and the upgrade of older files to the current format."""

from integrity import CHECKSUMS
from tokenizer import END_OF_TEXT, END_OF_TEXT_ID

# Version 1 had no format_version entry; its MLP layers were a Sequential (keys mlp.0 and mlp.2) and an adapter
# kept one random-number state rather than a list of each rank's. Up to version 2 the model's blocks were named
# body, and an adapter's prompt template was a dict of two format strings.
FORMAT_VERSION = 3
RENAMES = {  # the names each version changed: (old, new) substrings of the names before it
    2: ((".mlp.0.", ".mlp.up_projection."), (".mlp.2.", ".mlp.down_projection.")),
    3: (("body.", "blocks."),),
}


def upgraded(checkpoint: dict) -> dict:
    """An older checkpoint in the current format: the parameter names (in the weights, the adapters and the
    optimizer state), the random-number states as a list, and the prompt template as a PromptTemplate's dict.
    Of a sharded checkpoint the shards keep their names; written_in_format says which (see load_shards)."""
    version = checkpoint.get("format_version", 1)

    def renamed(name):
        return current_name(name, version) if isinstance(name, str) else name

    checkpoint = dict(checkpoint)
    for entry in ("model", "lora"):
        if isinstance(checkpoint.get(entry), dict):  # else checked_tensors names what it is
            checkpoint[entry] = {renamed(name): tensor for name, tensor in checkpoint[entry].items()}
    if "optimizer" in checkpoint:
        optimizer = checkpoint["optimizer"]
        checkpoint["optimizer"] = {"param_groups": [group | {"params": [renamed(name) for name in group["params"]]}
                                                    for group in optimizer["param_groups"]]}
        if "state" in optimizer:  # a sharded checkpoint's index has only the groups
            checkpoint["optimizer"]["state"] = {renamed(name): state for name, state in optimizer["state"].items()}
    if isinstance(checkpoint.get("rng"), dict):
        checkpoint["rng"] = [checkpoint["rng"]]
    if isinstance(checkpoint.get("prompt_template"), dict) and "with_input" in checkpoint["prompt_template"]:
        checkpoint["prompt_template"] = upgraded_template(checkpoint["prompt_template"])
    if isinstance(checkpoint.get(CHECKSUMS), dict):  # verified under today's names when resumed
        checkpoint[CHECKSUMS] = {renamed(name): value for name, value in checkpoint[CHECKSUMS].items()}
    if "shards" in checkpoint:
        checkpoint["written_in_format"] = version
    checkpoint["format_version"] = FORMAT_VERSION
    return checkpoint


def upgraded_template(saved: dict) -> dict:
    """A prompt template stored before templates were objects ({with_input, without_input} format strings of
    {instruction} and {input}) as conversations.PromptTemplate.to_dict gives it; it renders every record as before:
    the whole prompt one text, the response, then <|endoftext|>."""
    forms = [saved.get("with_input"), saved.get("without_input")]
    if not all(isinstance(form, str) for form in forms):  # left for PromptTemplate.from_dict to refuse in one line
        return saved
    return {"name": "alpaca", "turns": {"user": [form.replace("{instruction}", "{content}") for form in forms]},
            "reply_opening": "", "reply_closing": END_OF_TEXT, "stop_tokens": [END_OF_TEXT_ID]}


def current_name(name: str, version: int) -> str:
    """A parameter's name in the current format, from its name in the format `version`."""
    for changed_in in range(version + 1, FORMAT_VERSION + 1):
        for old, new in RENAMES.get(changed_in, ()):
            name = name.replace(old, new)
    return name


def name_in_version(name: str, version: int) -> str:
    """A parameter's name in the format `version`, from its current name."""
    for changed_in in range(FORMAT_VERSION, version, -1):
        for old, new in RENAMES.get(changed_in, ()):
            name = name.replace(new, old)
    return name
