"""The clustering broker: placement, tracking, settings and election over the cluster store.

Not built yet (issue "Clustering broker on a real cluster store"); the package exists so
that its layout and typing are in place from the first commit.
"""
