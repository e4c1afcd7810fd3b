"""Census: first-conv filters, mean preferred stimuli and actmax images -> neuron types.

`types` reads one pattern (orientation, colour opponency); `patterns` turns tables and filters into
patterns in stimulus space; `inputs` gathers them from a results folder."""
