"""The host model: Qwen2.5-VL with a selection method between its vision tower and its LM.

`qtsplus.host.model.QTSplusForConditionalGeneration` (transformers subclass: select, splice, run the LM) and its config;
`qtsplus.host.splice` (how a selection is spliced into the sequence, plain tensors). Import from the modules: this
package init stays empty so that `qtsplus.selectors` can use the splice helpers without loading transformers' model.
"""
