"""The one nearest-name helper behind every "did you mean" in config, block, model and zoo errors."""
import difflib


def nearest(name, names):
    """The valid name closest to ``name`` (similar spelling, or one is a prefix of the other), or None."""
    name, names = str(name), [str(n) for n in names]
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if match:
        return match[0]
    low = name.lower()
    prefix = [n for n in names if low.startswith(n.lower()) or n.lower().startswith(low)]
    if prefix:
        return max(prefix, key=len)
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    return match[0] if match else None


def did_you_mean(name, names, prefix=""):
    """`` (did you mean 'x'?)`` for the nearest of ``names``, or '' when none is near."""
    match = nearest(name, names)
    return f" (did you mean '{prefix}{match}'?)" if match is not None else ""
