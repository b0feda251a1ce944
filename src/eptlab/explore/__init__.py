"""The interactive walk explorer: one self-contained HTML page that steps through a
two-dimensional walk of the reference walker (``eptlab explore``)."""

from .model import cache_options, explorer_data, grid_of, outcome_of
from .page import render_page

__all__ = ["cache_options", "explorer_data", "grid_of", "outcome_of", "render_page"]
