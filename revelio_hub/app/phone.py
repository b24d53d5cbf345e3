"""The app at phone width (390 px): results brought into view, nothing cut, touch targets of 40 px.

On a phone Gradio stacks the two columns of the Analyze tab, so the results
start about one screen below the Analyze button; a user who taps it sees
nothing change. Gradio's own ``scroll_to_output`` scrolls on every screen, so
the app runs a small script after a successful analysis instead, which scrolls
only when the first result lies outside the window.

The style sheet applies below 480 px only (desktop layout is untouched):
labels and captions wrap instead of ending in "...", the selected-neuron
dropdown gets the full width, galleries use two columns that fit, and every
control a finger taps (icon buttons, the checkbox with its label, accordion
headers, tabs, the footer's links) is at least 40 px each way, the usual
minimum for touch targets. Kept apart from :mod:`revelio_hub.app.ui` so the
layout code and the phone rules change independently.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PHONE_CSS", "PHONE_HEAD", "RESULTS_IN_VIEW_JS", "PHONE_MAX_WIDTH", "scroll_to_results"]

#: Widths at or below this get the phone rules (a 390-px phone, a small tablet in portrait is above).
PHONE_MAX_WIDTH = 480

#: Minimum touch target, px (both directions).
TOUCH_PX = 40

PHONE_CSS = f"""
@media (max-width: {PHONE_MAX_WIDTH}px) {{
  /* Touch targets: icon buttons (fullscreen, download, share, copy, remove), upload sources, tabs,
     accordion headers, the label's class rows and the footer's links. */
  .icon-button, button.icon, .source-selection button, button[aria-label='More tabs'], a.download-link,
  button.copy_code_button {{
    min-width: {TOUCH_PX}px !important; min-height: {TOUCH_PX}px !important;
    display: inline-flex; align-items: center; justify-content: center;
  }}
  [role=tab], button.label-wrap, button.confidence-set, button.lg, button.md, button.sm {{
    min-height: {TOUCH_PX}px !important;
  }}
  a.built-with, a.run-history, button.settings, button.show-api {{
    min-height: {TOUCH_PX}px !important; display: inline-flex; align-items: center;
  }}
  /* Dropdowns: the box around the text field is what a finger taps. */
  div.wrap:has(input[role=listbox]), div.wrap:has(input[aria-expanded]) {{ min-height: {TOUCH_PX}px !important; }}
  /* The checkbox: a larger box, and its whole label row is the target. */
  input[type=checkbox] {{ width: 24px !important; height: 24px !important; }}
  label:has(> input[type=checkbox]) {{ min-height: {TOUCH_PX}px; align-items: center; }}
  /* Labels wrap instead of being cut, in their own line above the content (not floating over it):
     block labels (the heat map's), gallery captions. */
  [data-testid=block-label] {{ position: relative !important; white-space: normal !important; height: auto !important;
                              max-width: calc(100% - 140px); margin-bottom: 6px; }}
  .caption-label {{ white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
                    max-width: 100% !important; position: static !important; transform: none !important;
                    margin: 4px !important; }}
  /* A captioned gallery tile: the picture, then its caption below it (not written over the picture). */
  .thumbnail-item:has(.caption-label) {{ aspect-ratio: auto !important; height: auto !important;
                                         display: flex !important; flex-direction: column; }}
  .thumbnail-item:has(.caption-label) > img {{ aspect-ratio: 1 / 1; width: 100% !important; height: auto !important; }}
  /* The selected neuron and its description stack: the dropdown gets the whole width. */
  #neuron-pick {{ flex-direction: column !important; }}
  #neuron-pick > * {{ min-width: 100% !important; }}
  /* Galleries: two columns that fit inside the screen, every tile shown (no inner scroll box cutting
     the last row or a caption). */
  .grid-container {{ grid-template-columns: repeat(2, minmax(0, 1fr)) !important; }}
  .grid-wrap {{ height: auto !important; max-height: none !important; }}
  .block:has(> .gallery-container), .gallery-container {{ height: auto !important; }}
  /* The image input keeps room for its larger source buttons (upload, paste) below the picture. */
  #image-in, #image-in .image-container {{ height: auto !important; }}
  #image-in .image-frame, #image-in .upload-container {{ min-height: 240px; }}
}}
"""

#: The style sheet as a ``<head>`` element (``launch(head=...)``): Gradio scopes ``css=`` rules to its
#: container, which leaves out the footer's links.
PHONE_HEAD = f"<style>{PHONE_CSS}</style>"

#: After Analyze: scroll to the first visible result (the out-of-distribution warning, the predictions or
#: the note that replaces them) when it is not already in the upper half of the window.
RESULTS_IN_VIEW_JS = """() => {
  const first = [...document.querySelectorAll('#ood-warning, #predictions, #predictions-note')]
    .filter((el) => el.offsetParent !== null && el.getBoundingClientRect().height > 0)
    .sort((a, b) => a.getBoundingClientRect().top - b.getBoundingClientRect().top)[0];
  if (!first) return;
  const top = first.getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight / 2) {
    window.scrollTo({top: window.scrollY + top - 8, behavior: 'smooth'});
  }
}"""


def scroll_to_results(analyzed: Any) -> None:
    """Run :data:`RESULTS_IN_VIEW_JS` in the browser after ``analyzed`` (an event) succeeds; no server call."""
    analyzed.success(None, None, None, js=RESULTS_IN_VIEW_JS, queue=False, api_visibility="private")
