"""The 8 flip/rotation views (the dihedral group D4) used for test-time augmentation, under the data pipeline's
name: they are defined once in `common.inference`, the runtime the ensemble and its Codabench copy share."""

from common.inference import VIEW_SETS, dihedral_index_maps, dihedral_view, view_indices

__all__ = ["VIEW_SETS", "dihedral_index_maps", "dihedral_view", "view_indices"]
