"""NLG task families (issue 5)."""
