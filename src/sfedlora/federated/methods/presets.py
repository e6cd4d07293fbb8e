"""Method presets: a name users pass as ``method`` → (the method, the scaling rule that
defines it in the literature, or None for a free choice). Plain data, so that the config
can validate a name without building a method."""

PRESETS: dict[str, tuple[str, str | None]] = {
    "fedit": ("fedit", None),
    "ffa-lora": ("ffa-lora", None),
    "fedsa-lora": ("fedsa-lora", None),
    "rolora": ("rolora", None),
    "fedsa-rslora": ("fedsa-lora", "rslora"),
    "sfed-lora": ("fedsa-lora", "sfed"),
    "fedex-lora": ("fedex-lora", None),
    "flora": ("flora", None),
    "flexlora": ("flexlora", None),
    "hetlora": ("hetlora", None),
    "feddpa": ("feddpa", None),
}
