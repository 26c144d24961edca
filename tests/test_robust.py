import torch

from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.robust import screen_updates, update_norm

G = {"w": torch.zeros(4)}


def up(cid, value):
    return ClientUpdate(cid, {"w": torch.full((4,), float(value))}, 10)


def test_norm_is_of_the_change():
    assert update_norm({"w": torch.ones(4)}, up(1, 3)) == 4.0


def test_clip_keeps_direction_and_bounds_the_norm():
    s = screen_updates(G, [up(1, 1), up(2, 1), up(3, 50)], multiple=2.0, mode="clip")
    assert s.clipped == 1 and not s.rejected
    clipped = s.kept[2].state["w"]
    assert torch.allclose(clipped, torch.full((4,), 2.0))


def test_reject_leaves_the_outlier_out():
    s = screen_updates(G, [up(1, 1), up(2, 1.2), up(3, 50)], multiple=2.0, mode="reject")
    assert [u.client_id for u in s.kept] == [1, 2]
    assert "median" in s.rejected[0][1]


def test_off_keeps_everything():
    s = screen_updates(G, [up(1, 1), up(2, 100)], multiple=0.0)
    assert len(s.kept) == 2
