// Marks on the body element how many images failed to load (a test and the reader both use it).
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var b = document.body;
  b.setAttribute('data-images-total', String(imgs.length));
  b.setAttribute('data-images-broken', String(broken.length));
  b.setAttribute('data-broken-src', broken.map(function (i) { return i.getAttribute('src'); }).join(' '));
  if (broken.length) {
    var d = document.createElement('p');
    d.className = 'broken';
    d.textContent = broken.length + ' image(s) failed to load';
    b.insertBefore(d, b.firstChild);
  }
});
