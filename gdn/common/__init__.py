"""What both gdn backends are built from, framework-neutral: ``spec`` (CHUNK_SIZE, the math and layouts of
chunk_fwd_o, chunk_gated_delta_rule and decode_step, chunk indices, op names), ``tilings`` (the static tiling
tables with the measurements behind them), ``contract``, ``forward_contract`` and ``checks`` (the input contract
of each op), ``reference`` (float64 numpy references with the ops' signatures) and ``example`` (random inputs)."""
