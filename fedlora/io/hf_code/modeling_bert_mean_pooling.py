"""A BERT sequence classifier that reads the mean of the token states over the attention
mask instead of BERT's pooler: the pooling sentence-embedding models such as
all-MiniLM-L6-v2 are trained with. Written by fedlora into a model or adapter folder;
it needs transformers and torch only.

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(weights, config=config, trust_remote_code=True)

``weights`` is the folder itself for a full model, or the base model's folder for an
adapter folder (then load the adapter with ``peft.PeftModel.from_pretrained``).
"""

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput


class BertMeanPoolingConfig(BertConfig):
    model_type = "bert_mean_pooling"


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each sequence's token states over its attention mask (padding excluded)."""
    if attention_mask is None:
        return states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: BertMeanPoolingConfig) -> torch.Tensor:
    """The loss BertForSequenceClassification computes, by the config's problem type."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BertMeanPoolingForSequenceClassification(BertForSequenceClassification):
    """BertForSequenceClassification with the pooler replaced by the masked mean of the
    token states; module names (``bert.*``, ``classifier``) are BERT's own."""

    config_class = BertMeanPoolingConfig
    # a plain BERT checkpoint's pooler weights have no place here
    _keys_to_ignore_on_load_unexpected = [r"pooler\."]

    def __init__(self, config: BertMeanPoolingConfig) -> None:
        super().__init__(config)
        self.bert.pooler = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        pooled = masked_mean(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else classification_loss(logits, labels, self.config)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict is not False else output.to_tuple()


# Loading this file for the config (AutoConfig) also tells AutoModelForSequenceClassification
# its model class, so an adapter folder's config can be put on a plain BERT checkpoint's weights.
AutoModelForSequenceClassification.register(
    BertMeanPoolingConfig, BertMeanPoolingForSequenceClassification, exist_ok=True
)
