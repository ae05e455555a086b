"""hetlm: the language of browsing.

Click logs -> page-level sessions -> small decoder LMs (single, k-means clusterwise, HeTLM)
-> next-session generation and outcome prediction.
"""

__version__ = "0.1.0"
