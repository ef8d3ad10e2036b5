"""A study's report: the ranked-trials tables, the HTML pages and the dashboard."""
