"""Tables and figures a person puts in a paper: Markdown tables, PNG plots."""
