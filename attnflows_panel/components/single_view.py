"""SingleView: one input through one model."""

from __future__ import annotations

from attnflows_panel.analysis.embedding import HeadEmbedding
from attnflows_panel.analysis.flows import PRETRAINED
from attnflows_panel.components.attention_view import AttentionView
from attnflows_panel.models.loading import LoadedModel
from attnflows_panel.plots import short_name


class SingleView(AttentionView):
    """A sentence's attention in one model: grid by a head measure, CLS flows, matrices, sentence view."""

    def __init__(self, model: LoadedModel, text: str | None = None, *, head_map: HeadEmbedding | None = None, title: str | None = None, **params: object) -> None:
        super().__init__({PRETRAINED: model}, model, text, head_map, {PRETRAINED: title or short_name(model.model_id)}, **params)

