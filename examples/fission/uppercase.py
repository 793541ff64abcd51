"""A Fission function for the Python environment: the request body, upper-cased.

Fission's Python environment loads this module and calls `main()` for every request routed to
the function, with Flask's `request` describing it. As a vow continuation target (an `invoke`
step whose URL is the Fission router's `/fission-function/uppercase`), the body is the source
promise's value and the answer resolves the target.
"""

from flask import request


def main():
    text = request.get_data(as_text=True)
    step = request.headers.get("Vow-Source-Id", "")
    return text.upper() + (f" (after {step})" if request.headers.get("X-Show-Source") else "")
